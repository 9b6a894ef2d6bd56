import sys

from ftflow.cli import main

sys.exit(main())
