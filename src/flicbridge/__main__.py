import sys

from flicbridge.cli import main

sys.exit(main())
