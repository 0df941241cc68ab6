"""The sidetrace agent: the host daemon and its components."""
