"""`accelerate launch -m ftflow.train <stage config> <root>`: one training process."""

import sys

from ftflow.progress import setup_logging
from ftflow.train.worker import main

setup_logging()
main(*sys.argv[1:])
