import sys
from deqppl.cli import main
sys.exit(main())
