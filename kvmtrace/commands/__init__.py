"""The commands, one module each (serve, trace, explain, doctor): each composes its
command from the layers below; kvmtrace.cli parses the arguments and dispatches here.
This is the top layer: nothing below imports it."""
