"""`python -m kimi_lora_cli` entry point."""

from kimi_lora_cli.cli.app import main

if __name__ == "__main__":
    main()
