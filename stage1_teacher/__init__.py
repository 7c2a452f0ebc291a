"""stage1_teacher"""
