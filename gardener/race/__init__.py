"""Races: the smoke race, leaderboards and gates, and the backtest of the decision policy."""
