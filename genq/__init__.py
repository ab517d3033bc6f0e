"""genq: the command line (`genq ...`) and the one settings class.

May import api/, db/, storage/ and workers/; nothing imports genq/ except genq.settings.
"""
