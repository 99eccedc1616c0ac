"""Corpora, tokenizer and indexed-dataset preprocessing for the training tool."""
