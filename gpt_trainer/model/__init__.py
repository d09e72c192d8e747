"""The model: the GPT in one file, and its mapping to and from Hugging Face transformers."""
