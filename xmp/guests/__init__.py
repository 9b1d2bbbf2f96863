"""Example guest kernels; they double as the fixtures of the tests.

    idle     does nothing, using no CPU
    hello    greets on its console a few times, sleeping on timers, then powers off
    counter  counts on its console (args: count, interval), then powers off
    crasher  raises after an optional delay (args: after)
"""
