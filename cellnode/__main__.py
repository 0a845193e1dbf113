from cellnode.cli import main

main()
