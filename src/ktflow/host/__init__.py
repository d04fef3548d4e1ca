"""What this machine and a Python environment on it have: CPU, NUMA, memory, disk, GPUs, packages."""
