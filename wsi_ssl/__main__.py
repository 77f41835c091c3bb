import sys

from wsi_ssl.cli import main

sys.exit(main())
