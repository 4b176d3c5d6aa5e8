"""Client behaviours: one file per behaviour, composed by the one ClientApp."""
