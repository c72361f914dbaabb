"""Where agent state lives (device, host, disk) and how it moves, by invocation distance."""
