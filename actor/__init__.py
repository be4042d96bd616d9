"""Actor side: inference engines, tree sampler, actor process."""
