"""f-DPO's divergences and the DPO losses they generalize, by name: what ``--f-divergence-type`` takes and
the loss types it applies to, apart from the losses' torch code (:mod:`qlora.train.preference_loss`) so that
checking the options does not import torch."""

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# The DPO losses of a score difference, which f-DPO generalizes (TRL 1.16's list; sft has no scores).
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
