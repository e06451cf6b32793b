"""kkontras/MLB's Bias_Infusion_MSLR (Bias_Infusion.py lines 1438-1502) transcribed once, for
tests/methods/test_authors_loops_mlb_mslr.py (the whole Trainer loop) and
tests/methods/test_methods_mslr.py (the rule alone). docs/semantics.md, MSLR."""
from collections import defaultdict

import numpy as np


class AuthorsMSLR:
    """Bias_Infusion_MSLR: before_backward (the fused loss only), on_epoch_begin,
    on_backward_end, _equalize_gradients (encoders only)."""

    def __init__(self, model, init_learning_rate, keep_memory_epoch, starting_epoch=0,
                 ending_epoch=1500):
        self.model = model
        self.init_learning_rate = init_learning_rate
        self.coeff_memory = defaultdict(list)
        self.keep_memory_epoch = keep_memory_epoch
        self.starting_epoch, self.ending_epoch = starting_epoch, ending_epoch
        self.ratio = defaultdict(lambda: 1)

    def before_backward(self, total, output_losses):
        return output_losses["ce_loss_combined"], output_losses, False

    def on_epoch_begin(self, current_epoch, val_logs):
        if current_epoch < 1:
            return
        acc_0 = val_logs[list(val_logs.keys())[-1]]["acc"]["c"]
        acc_1 = val_logs[list(val_logs.keys())[-1]]["acc"]["g"]
        if current_epoch > self.keep_memory_epoch:
            ratio_0 = acc_0 / np.array(self.coeff_memory[0][-self.keep_memory_epoch:]).mean()
            ratio_1 = acc_1 / np.array(self.coeff_memory[1][-self.keep_memory_epoch:]).mean()
        else:
            ratio_0, ratio_1 = 1, 1
        self.ratio[0] = ratio_0
        self.ratio[1] = ratio_1
        self.coeff_memory[0].append(acc_0)
        self.coeff_memory[1].append(acc_1)

    def on_backward_end(self, current_epoch):
        coeff_0 = self.ratio[0] * self.init_learning_rate["c"]
        coeff_1 = self.ratio[1] * self.init_learning_rate["g"]
        self._equalize_gradients(current_epoch, coeff_0=coeff_0, coeff_1=coeff_1)
        return float(coeff_0), float(coeff_1)

    def _equalize_gradients(self, current_epoch, coeff_0=1, coeff_1=1):
        if self.starting_epoch <= current_epoch <= self.ending_epoch:
            for name, params in self.model.named_parameters():
                if params.grad is None:
                    continue
                if "mod0" in name or "enc_0" in name:
                    params.grad *= coeff_0
                if "mod1" in name or "enc_1" in name:
                    params.grad *= coeff_1
