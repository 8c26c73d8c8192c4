import sys

from natlb.cli import main

sys.exit(main())
