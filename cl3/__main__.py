from cl3.cli import main

main()
