"""Library code shared by the pipeline's stage scripts and the ``cxr-predict`` command."""
