"""The ``h0mini`` console script's entry point, outside the package on purpose.

``h0mini.interrupt.started_as_command()`` asks whether this module is running, rather than
guessing from ``sys.argv`` (a user's script or folder named ``h0mini`` is not the command).
It must be set before ``import h0mini`` runs, which is why it cannot live inside the package.
"""

RUNNING = False


def main() -> None:
    global RUNNING
    RUNNING = True  # read by h0mini/__init__ as it imports, just below
    from h0mini.cli import entrypoint

    entrypoint()
