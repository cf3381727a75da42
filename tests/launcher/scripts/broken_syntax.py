"""Does not compile: distrib-run says so once, before any rank starts."""
def f(:
    pass
