"""The exception every lemon_ext user error raises."""


class LemonError(ValueError):
    """Bad input to lemon_ext: the message names the tensor, field or file at fault."""
