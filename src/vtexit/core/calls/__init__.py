"""What the schedule engine does in each kind of call: deciding the kind (:mod:`.kinds`), an eager prefill's layer
boundaries (:mod:`.eager_prefill`), a prefill planned from shapes under ``torch.compile`` (:mod:`.traced_prefill`),
and decode steps on a dynamic (:mod:`.dynamic_decode`) or a static cache (:mod:`.static_decode`)."""
