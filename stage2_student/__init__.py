"""stage2_student"""
