import sys

from upcycling.cli.main import main

sys.exit(main())
