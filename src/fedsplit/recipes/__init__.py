"""Recipes: the runs a user starts from the command line, each reading top to bottom.

A recipe turns a :class:`fedsplit.config.RunConfig` into plain arguments for library classes.
"""
