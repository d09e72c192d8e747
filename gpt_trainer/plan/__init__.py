"""The run plan: every value a run derives from its flags, the hardware, the data and the checkpoint, resolved once; the
memory plan and the batch that fits."""
