"""The run plan: the resolve step that settles the configuration and refuses every conflict between flags first, then
every value a run derives from it, the hardware, the data and the checkpoint, resolved once; the memory plan and the
batch that fits."""
