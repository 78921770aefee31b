from flowrl_megatron.cli import main

main()
