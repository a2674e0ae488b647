from gradscope.cli.main import main

main()
