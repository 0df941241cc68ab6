import sys

from sidetrace.cli import main

sys.exit(main())
