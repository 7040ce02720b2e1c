from vpt_fast.cli import main

main()
