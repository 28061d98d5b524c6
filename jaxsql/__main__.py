import sys

from jaxsql.cli import main

sys.exit(main())
