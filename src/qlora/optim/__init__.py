"""qlora.optim"""
