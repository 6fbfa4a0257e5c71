from v4cli.cli import main

main()
