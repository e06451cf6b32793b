"""placeholder"""
class ModulatedOptimizer: pass
