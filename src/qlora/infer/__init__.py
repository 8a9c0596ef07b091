"""qlora.infer"""
