import sys

from kvmtrace.cli import main

sys.exit(main())
