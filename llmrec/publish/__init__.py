"""Publishing: model cards now; export to stock formats, Hub push and vLLM serving as methods need them."""
