"""Entry point that run.sh calls: trains with the options of train.py (see `python main.py --help`)."""
from train import main

if __name__ == "__main__":
    main()
