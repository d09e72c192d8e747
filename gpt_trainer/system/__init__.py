"""What the run stands on: the device and its precision rules, the processes of a job, compiling, the run folder."""
