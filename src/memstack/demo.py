"""A small synthetic multi-session conversation, written for this project (no dataset needed)."""

from __future__ import annotations

DEMO_CONVERSATION = {
    "id": "demo-maya-leo",
    "sessions": [
        {"id": "1", "date": "2024-03-02T18:10:00Z", "turns": [
            {"id": "S1:1", "speaker": "Maya", "text": "Hey Leo! I finally signed up for the Lisbon half marathon in June."},
            {"id": "S1:2", "speaker": "Leo", "text": "That's great. Are you following a training plan?"},
            {"id": "S1:3", "speaker": "Maya", "text": "Yes, four runs a week. My knee hurt yesterday, so I'm easing off a bit."},
            {"id": "S1:4", "speaker": "Leo", "text": "Take care of that knee. I started pottery classes on Thursdays, by the way."},
            {"id": "S1:5", "speaker": "Maya", "text": "Pottery! Show me your first bowl when it's fired."},
            {"id": "S1:6", "speaker": "Leo", "text": "Deal. My sister Ana is visiting from Porto next weekend."},
        ]},
        {"id": "2", "date": "2024-04-14T09:30:00Z", "turns": [
            {"id": "S2:1", "speaker": "Leo", "text": "We adopted a rescue dog two weeks ago. Her name is Pimenta."},
            {"id": "S2:2", "speaker": "Maya", "text": "Oh I love that name. What breed is she?"},
            {"id": "S2:3", "speaker": "Leo", "text": "A beagle mix, about three years old. She steals socks."},
            {"id": "S2:4", "speaker": "Maya", "text": "Ha. My training is going well, I ran 16 km last Sunday without knee pain."},
            {"id": "S2:5", "speaker": "Leo", "text": "Impressive. The pottery teacher says my glazing is getting better."},
        ]},
        {"id": "3", "date": "2024-05-20T20:05:00Z", "turns": [
            {"id": "S3:1", "speaker": "Maya", "text": "I got the job offer from the solar energy startup in Copenhagen!"},
            {"id": "S3:2", "speaker": "Leo", "text": "Congratulations! Will you move there?"},
            {"id": "S3:3", "speaker": "Maya", "text": "In September. I'm nervous about the winters, but the team is lovely."},
            {"id": "S3:4", "speaker": "Leo", "text": "Pimenta and I will visit. She has never seen snow."},
            {"id": "S3:5", "speaker": "Maya", "text": "Bring warm socks, since she steals yours anyway."},
        ]},
        {"id": "4", "date": "2024-06-23T12:00:00Z", "turns": [
            {"id": "S4:1", "speaker": "Maya", "text": "I finished the Lisbon half marathon yesterday in 1 hour 58 minutes!"},
            {"id": "S4:2", "speaker": "Leo", "text": "Under two hours, amazing. How did the knee hold up?"},
            {"id": "S4:3", "speaker": "Maya", "text": "No pain at all. The physiotherapy in April really helped."},
            {"id": "S4:4", "speaker": "Leo", "text": "I sold my first three vases at the craft fair last Saturday."},
            {"id": "S4:5", "speaker": "Maya", "text": "Your pottery is paying off! Save me a vase for my Copenhagen flat."},
        ]},
    ],
}

DEMO_QUERIES = [
    "What pet does Leo have?",
    "When did Maya run the half marathon?",
    "Where is Maya moving for her new job?",
    "What happened with Maya's knee?",
    "What does Leo make in his classes?",
]
