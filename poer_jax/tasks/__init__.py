"""Built-in tasks: a synthetic arithmetic task (``toy``) and a tiny local tokenizer (``tiny_tokenizer``)."""
