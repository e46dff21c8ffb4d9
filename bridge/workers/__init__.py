"""Workers: small loops that each run one kind of durable job from the state store."""
