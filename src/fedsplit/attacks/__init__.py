"""Privacy attacks on federated split fine-tuning (FL-GLM, arXiv 2406.14898): what each party can read back.

Never imported by training code. Each module is one attacker's tool:

* :mod:`~fedsplit.attacks.hidden`    the hidden states the server receives at cut 1, for any head depth p
* :mod:`~fedsplit.attacks.inversion` nearest-neighbour and learned (ridge / softmax) embedding inversion
  (SIP / BiSR forward attack, arXiv 2409.00960)
* :mod:`~fedsplit.attacks.gradients` label (= response-token) leakage of the gradients at the cuts
  (analytic, and TAG / LAMP-style gradient matching)
* :mod:`~fedsplit.attacks.traffic`   the eavesdropper and the peer client: sealed frames of a real step
* :mod:`~fedsplit.attacks.defences`  quality cost of the defences (noise, adversarial head training)
* :mod:`~fedsplit.attacks.audit`     the per-batch scores a client computes on its own traffic
* :mod:`~fedsplit.attacks.report`    ``privacy_report.json`` and ``privacy.png``

Nothing heavy happens at import.
"""
