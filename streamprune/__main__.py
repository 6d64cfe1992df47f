import sys

from streamprune.cli import main

sys.exit(main())
