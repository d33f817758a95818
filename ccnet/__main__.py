"""`python -m ccnet [group=option ...] [key=value ...]`: what `python run.py` runs, from anywhere (ccnet/cli.py)."""

from ccnet.cli import main

if __name__ == "__main__":
    main()
