"""One entry module per ``ktflow <command>``: argparse and a call into the step's family package."""
