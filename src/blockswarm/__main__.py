from blockswarm.cli import main

if __name__ == "__main__":  # (a forked process imports this module again under another name)
    main()
