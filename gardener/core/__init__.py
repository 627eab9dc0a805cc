"""The pure decision core: plain data in, plain data out; no database, no network, no event loop."""
