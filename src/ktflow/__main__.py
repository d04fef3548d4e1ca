import sys

from ktflow.cli import main

sys.exit(main())
